"""The operator's control plane: a gRPC service over what the bus already says (heartbeats,
the sessions bucket, session events), and the ``voxbus ctl`` client's connection to it."""
