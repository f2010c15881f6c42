"""Surviving real process loss: the per-rank supervisor, the job's membership store, and the trainer loop that
re-forms the process group and rebuilds lost stages. The supervisor and the trainer share :mod:`.contract`."""
