// Module VBDControl: see docs/ARCHITECTURE.md.
