"""The cluster: nodes and projects, how a spec reaches a node (transports, SSH), git mode, collecting."""
