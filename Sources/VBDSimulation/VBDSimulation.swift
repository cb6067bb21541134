// Module VBDSimulation: see docs/ARCHITECTURE.md.
