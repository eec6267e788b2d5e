"""fltac on Flower: the apps live in fltac.engines.flower; these modules only name them for `flwr run`."""
