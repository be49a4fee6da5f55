"""The reproduction study of DRTune's claims on the shipped shapes-sd model (docs/reproduction.md)."""
