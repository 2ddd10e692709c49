"""The Discord side: one cog per feature (train, gen, library, admin) on a discord.py bot; see app.py."""
