"""Naming the leaves of parameter trees (nested dicts or nnx.States) by their paths."""

import jax


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


def align(values, like):
    """`values` laid out as `like`: each leaf of `like` replaced by the leaf of `values` with
    the same path names, so a tree of nested dicts can serve an nnx.State of Variables (or an
    optax tree whose other leaves are masked out). A leaf `values` lacks is a ValueError."""
    table = {path_names(path): v for path, v in jax.tree_util.tree_flatten_with_path(values)[0]}

    def one(path, _):
        names = path_names(path)
        if names not in table:
            raise ValueError(f"no entry for {'/'.join(map(str, names))} among "
                             f"{len(table)} leaves")
        return table[names]

    return jax.tree_util.tree_map_with_path(one, like)
