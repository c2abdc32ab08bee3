"""Naming the leaves of parameter trees (nested dicts or nnx.States) by their paths."""


def path_names(path) -> tuple:
    """The names along a tree path: dict keys, list indices, attribute names (not 'value')."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(getattr(key, attr))
                break
        else:
            names.append(str(key))
    if names and names[-1] == "value":  # the array inside an nnx.Variable
        names.pop()
    return tuple(names)
