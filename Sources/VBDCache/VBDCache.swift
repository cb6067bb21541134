// Module VBDCache: see docs/ARCHITECTURE.md.
