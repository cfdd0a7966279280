"""Showing results: terminal tables and plots. Rendering never computes a figure.
"""
