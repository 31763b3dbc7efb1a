def from_keras(*a): pass
def to_keras(*a): pass
