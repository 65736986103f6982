"""Small analysis programs over committed results and the testbed checkpoint (one question each)."""
