"""A small-scale replication of the PSFT paper's claims, trained through PSFTTrainer (README.md)."""
