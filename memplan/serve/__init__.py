"""`memplan serve`: the planner as a local web page, and `memplan estimate --html`'s file.

form.py reads the page's inputs as the commands read their options; view.py computes what the commands
compute; chart.py draws one plan's memory by phase as SVG; render.py writes the HTML (templates/); app.py is
the Flask app. Flask is imported by app.py only: `memplan estimate --html` renders without it.
"""
