"""What an agent process imports: span export, kill switch, session guard."""
