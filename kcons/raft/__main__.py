"""``python -m kcons.raft ...``: the ``kcons raft`` commands without the top-level CLI."""

from kcons.cli.raft import raft

if __name__ == "__main__":
    raft()
