"""A stand-in for your lab's own code: a network (nets.py) and the parser that loads it (parsers.py)."""
