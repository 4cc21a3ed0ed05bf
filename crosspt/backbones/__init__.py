"""Frozen backbones wrapped through `inputs_embeds`: one adapter per family, one small interface."""
