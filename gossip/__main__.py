"""`python -m gossip ...`: the standalone agent's command line (see `gossip.agent`)."""

from gossip.agent import main

if __name__ == "__main__":
    raise SystemExit(main())
