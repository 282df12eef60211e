"""Small helpers with no cdalign dependency (standard library only), usable from every
layer, the math core included: the check that an output folder holds no earlier run."""
