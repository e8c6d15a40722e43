"""Check values against the JSON schema dialect of PVE's API description.

apidata.json (the schema of PVE's API viewer) is a tree of nodes with `path`,
`children` and `info`, a map from HTTP method to {parameters, returns, ...}.
The dialect, as far as answers need it: `type` (booleans are the integers 0
and 1), `optional: 1` (a property without it is required), `enum`, `minimum`,
`maximum`, `pattern` (anchored, Perl syntax), `maxLength`, `minLength`,
`items`, `properties` (`scsi[n]` stands for scsi0, scsi1, ...) and
`additionalProperties`, which forbids other properties only when it is 0.
"""

import json
import re

TYPES = {
    'string': lambda v: isinstance(v, str),
    'integer': lambda v: type(v) is int,
    'number': lambda v: type(v) in (int, float),
    'boolean': lambda v: type(v) is int and v in (0, 1),
    'array': lambda v: isinstance(v, list),
    'object': lambda v: isinstance(v, dict),
    'null': lambda v: v is None,
    'any': lambda v: True,
}


def load_methods(path):
    """apidata.json as {(method, path template): info}."""
    with open(path, encoding='utf-8') as file:
        pending = json.load(file)
    methods = {}
    while pending:
        node = pending.pop()
        for method, info in node.get('info', {}).items():
            methods[method, node['path']] = info
        pending.extend(node.get('children', []))
    return methods


def validate(value, schema, where='$'):
    """How `value` breaks `schema`: a list of 'where: what' (empty when it fits)."""
    kind = schema.get('type', 'any')
    if not TYPES[kind](value):
        return ['{}: {!r} is not of type {}'.format(where, value, kind)]
    if isinstance(value, dict):
        return _object_errors(value, schema, where)
    if isinstance(value, list):
        items = schema.get('items', {})
        return [error for index, item in enumerate(value)
                for error in validate(item, items, '{}[{}]'.format(where, index))]
    return ['{}: {!r} {}'.format(where, value, problem)
            for problem in _scalar_problems(value, schema)]


def _object_errors(value, schema, where):
    properties = schema.get('properties', {})
    extra = schema.get('additionalProperties')
    errors = ['{}.{}: missing'.format(where, name) for name, prop in properties.items()
              if not prop.get('optional') and '[n]' not in name and name not in value]
    for name, item in value.items():
        prop = _property(properties, name)
        if prop is None and extra == 0:
            errors.append('{}.{}: not allowed by the schema'.format(where, name))
        elif prop is not None or isinstance(extra, dict):
            errors += validate(item, extra if prop is None else prop, '{}.{}'.format(where, name))
    return errors


def _property(properties, name):
    if name in properties:
        return properties[name]
    for key, prop in properties.items():
        if '[n]' in key and re.fullmatch(re.escape(key).replace(r'\[n\]', r'\d+'), name):
            return prop
    return None


def _scalar_problems(value, schema):
    if 'enum' in schema and value not in schema['enum']:
        yield 'is not one of {}'.format(schema['enum'])
    if isinstance(value, (int, float)):
        if 'minimum' in schema and value < float(schema['minimum']):
            yield 'is below {}'.format(schema['minimum'])
        if 'maximum' in schema and value > float(schema['maximum']):
            yield 'is above {}'.format(schema['maximum'])
    if isinstance(value, str):
        if 'pattern' in schema and not re.fullmatch(schema['pattern'].replace('(?^:', '(?:'),
                                                    value):
            yield 'does not match {}'.format(schema['pattern'])
        if len(value) > schema.get('maxLength', len(value)):
            yield 'is longer than {}'.format(schema['maxLength'])
        if len(value) < schema.get('minLength', 0):
            yield 'is shorter than {}'.format(schema['minLength'])
