print("vbd-sim: not yet")
