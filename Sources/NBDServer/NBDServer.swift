// Module NBDServer: see docs/ARCHITECTURE.md.
