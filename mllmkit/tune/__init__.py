"""Fine-tuning policies the core applies to model parts: LoRA adapters (peft), QLoRA quantization
(bitsandbytes), starting from an earlier run's export, and the memory estimate of a full fine-tune."""
