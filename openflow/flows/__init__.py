"""Flows: one protocol (``base.Flow``), couplings, canonical transformations, continuous flows, priors."""
