"""Sample-quality evaluation: ADM metrics (FID, sFID, IS, precision/recall) and their feature networks."""
