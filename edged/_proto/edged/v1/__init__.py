"""Generated from protos/edged/v1/ by tools/gen_protos.py. DO NOT EDIT."""
