"""The whole loop (``alignkit run``): the one part above the stages, the only one that imports them all."""
