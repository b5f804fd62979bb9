"""Operations: the guardian, the monitor, snapshots and restores, the agent CLI drift check."""
