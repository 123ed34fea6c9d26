"""Virtual actors: activation, mailbox, directory and cluster (see the actors issue).

The package exists so that the layering of DESIGN.md §2 is fixed from the start;
the repository tests already hold it to the determinism rules of kelpie.env.
"""

__all__: list[str] = []
