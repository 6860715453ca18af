"""voxbus: real-time voice agents as independently scaled Pipecat stages over NATS."""

__version__ = "0.1.0"
