"""Research techniques as Lightning callbacks: one subpackage per technique, each a functional
core (plain functions and classes on modules and tensors) plus a thin Callback that schedules
it, keeps its state in ``state_dict`` and logs."""
