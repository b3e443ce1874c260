"""Uses of trained SAEs beyond training and evaluation: interop with SAELens (saelens.py, and
saelens_switch.py for Switch SAEs inside SAELens); feature inspection (inspect.py), the static
feature pages it writes (pages/) and a local server for them (serve.py)."""
