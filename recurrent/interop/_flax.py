def from_flax(*a): pass
def to_flax(*a): pass
