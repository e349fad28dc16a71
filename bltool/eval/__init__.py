"""Evaluation: next-token NLL, the ICL probes and protocol, and the standard errors `report` decides with."""
