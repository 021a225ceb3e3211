"""cdam-pl: heads on frozen SSL ViTs, explained with class-discriminative attention maps."""
