"""Tool calling: tools into the prompt (the template's own or a default), calls out of the text."""
