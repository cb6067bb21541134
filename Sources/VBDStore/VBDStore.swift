// Module VBDStore: see docs/ARCHITECTURE.md.
