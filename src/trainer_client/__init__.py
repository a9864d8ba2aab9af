"""Student trainer: distillation from any number of teacher endpoints."""
