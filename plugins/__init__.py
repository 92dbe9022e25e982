"""Knowledge distillation for face recognition, as a plugin for arcface_torch.

Every module in this package depends on torch and numpy only, so the package can be copied into
any fork of arcface_torch.  See docs/ARCHITECTURE.md for the layout and the data flow.
"""
