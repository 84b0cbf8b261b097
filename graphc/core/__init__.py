"""The core: the graph IR, the ops (each one's type rule, numpy semantics and derivative), reverse
mode as a graph transform, the numpy reference executor and the optimizers' update rules.
Nothing here knows how graphs are compiled."""
