print("vbdtool: not yet")
