"""Commands for a finished run: export, evaluate, shift_check, codebook_report."""
