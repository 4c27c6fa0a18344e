"""The notebook layer: the magics (`magics`), the words of their lines (`options`) and the
reference every magic and API call is listed in (`reference`). Each magic parses, calls
one API function with only the options given, and displays: no logic, no defaults.
"""
