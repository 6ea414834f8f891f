"""The torch runtime that `memplan profile` and `memplan train` both build from: the plan's model (`model`), its
optimizer and master weights (`optim`), the loss (`loss`), the live-bytes meter (`meter`) and the Hugging Face
set-up they share (`hf`). Importing this package imports no torch; its modules do."""
