"""Preference training: offline DPO (TRL `DPOTrainer` + PEFT LoRA) with stored reference
log-probabilities, the SFT baseline, and reward-model training."""
