"""Everything that runs on Ray: connecting to a cluster, the catalog build and the patch
streams on Ray Data, IPB's labelling pass, the one training loop on Ray Train, the
cross-validation driver and the Tune search. Ray is imported inside functions, so these
modules import without it.
"""

__all__: list[str] = []
