"""Uses of trained SAEs beyond training and evaluation: interop with SAELens (saelens.py, and
saelens_switch.py for Switch SAEs inside SAELens)."""
