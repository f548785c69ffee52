print("e2e: not yet")
