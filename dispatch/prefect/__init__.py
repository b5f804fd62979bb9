"""The Prefect wing: storage and coordination through the Prefect server.

Slots, fair shares, file locks, team runs, node admin, the local server and the worker transport.
"""
