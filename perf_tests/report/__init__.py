"""Rendering: text, Markdown, JSON, plots, the study table, the one table helper. No torch, no ``sd``.
"""
