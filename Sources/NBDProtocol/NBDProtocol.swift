// Module NBDProtocol: see docs/ARCHITECTURE.md.
